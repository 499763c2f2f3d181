"""kpisettle gRPC service: proto messages in, engine calls, stored auditable decisions out."""
