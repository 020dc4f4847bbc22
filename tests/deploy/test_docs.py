"""The ops docs stay true: the API reference is a fresh render of the protos' comments, the
troubleshooting guide covers every error reason the code raises, the workflow diagrams are
there, and the paths the deploy guide names exist."""

from __future__ import annotations

import ast
import importlib.util
import re

from services.common.settings import REPO_ROOT

DOCS = REPO_ROOT / "docs"

_spec = importlib.util.spec_from_file_location("gen_api_reference", DOCS / "gen_api_reference.py")
gen_api_reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen_api_reference)


def test_api_reference_is_generated_from_the_protos() -> None:
    fresh = gen_api_reference.render(gen_api_reference.descriptors())
    committed = (DOCS / "api-reference.md").read_text()
    assert committed == fresh, "stale: run `make docs`"
    # Every service and RPC of the protos is in it, with its comment.
    for proto in (REPO_ROOT / "protos").rglob("*.proto"):
        for rpc in re.findall(r"^\s*rpc (\w+)\(", proto.read_text(), re.M):
            assert f"| `{rpc}` |" in fresh, rpc
        # The comment above each service, in the protos' words.
        for block, service in re.findall(r"((?:^//.*\n)+)service (\w+)", proto.read_text(), re.M):
            words = " ".join(line.lstrip("/ ").strip() for line in block.splitlines())
            assert words in fresh, service


def error_reasons() -> set[str]:
    """Every literal reason="..." passed to an error in services/ and gateway/."""
    reasons = set()
    for root in ("services", "gateway"):
        for path in (REPO_ROOT / root).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call):
                    for kw in node.keywords:
                        if kw.arg == "reason" and isinstance(kw.value, ast.Constant):
                            reasons.add(kw.value.value)
    return reasons


def test_troubleshooting_covers_every_error_reason() -> None:
    text = (DOCS / "troubleshooting.md").read_text()
    reasons = error_reasons()
    assert len(reasons) > 50
    documented = set(re.findall(r"^\| `([A-Z0-9_]+)` \|", text, re.M))
    assert not reasons - documented, (
        f"add to docs/troubleshooting.md: {sorted(reasons - documented)}"
    )


def test_workflow_diagrams_are_mermaid() -> None:
    text = (DOCS / "workflows.md").read_text()
    blocks = re.findall(r"```mermaid\n(.*?)```", text, re.S)
    assert len(blocks) >= 3
    kinds = {b.split()[0] for b in blocks}
    assert kinds <= {"sequenceDiagram", "flowchart"}
    for title in ("request path", "feedback loop", "Hot-swap"):
        assert title in text


def test_paths_named_in_the_deploy_guide_exist() -> None:
    text = (DOCS / "deploy.md").read_text()
    for path in set(re.findall(r"`((?:deploy|docs|config)/[\w./-]+)`", text)):
        assert (REPO_ROOT / path.rstrip("/")).exists() or "*" in path, path
    for command in ("cp deploy/compose.env.example .env", "docker compose up -d --build",
                    "kubectl apply -k deploy/k8s/overlays/dev"):  # fmt: skip
        assert command in text
