from __future__ import annotations

import hashlib

import pytest

from services.common.errors import DataLoss, InvalidArgument
from services.common.names import check_adapter_name, check_tenant
from services.inference.store import AdapterStore, collect_files

CONFIG = b'{"peft_type": "LORA"}'
WEIGHTS = b"weights"


@pytest.mark.parametrize("name", ["retailer", "bank-eu", "t_1", "a" * 63])
def test_valid_tenant_ids(name):
    assert check_tenant(name) == name


@pytest.mark.parametrize("name", ["", "Bank", "../x", "a/b", "_platform", "a" * 64, "a b", "é"])
def test_invalid_tenant_ids(name):
    with pytest.raises(InvalidArgument):
        check_tenant(name)


@pytest.mark.parametrize("name", ["support", "Support.v2", "a-b_c"])
def test_valid_adapter_names(name):
    assert check_adapter_name(name) == name


@pytest.mark.parametrize("name", ["", "..", "../etc", "a/b", "a\\b", ".hidden", "a..b", "x" * 129])
def test_invalid_adapter_names(name):
    with pytest.raises(InvalidArgument):
        check_adapter_name(name)


def test_collect_files_accepts_a_peft_directory_and_hashes_the_weights():
    files = collect_files({"adapter_config.json": CONFIG, "adapter_model.safetensors": WEIGHTS})
    assert files.sha256 == hashlib.sha256(WEIGHTS).hexdigest()


@pytest.mark.parametrize(
    ("files", "reason"),
    [
        ({"adapter_config.json": CONFIG, "adapter_model.bin": WEIGHTS}, "PICKLE_REFUSED"),
        ({"adapter_config.json": CONFIG, "model.pt": WEIGHTS}, "PICKLE_REFUSED"),
        ({"adapter_config.json": CONFIG}, "MISSING_FILE"),
        ({"../adapter_config.json": CONFIG, "adapter_model.safetensors": WEIGHTS}, "BAD_FILE"),
        (
            {"adapter_config.json": CONFIG, "adapter_model.safetensors": WEIGHTS, "x.py": b""},
            "BAD_FILE",
        ),
    ],
)
def test_collect_files_refuses_bad_uploads(files, reason):
    with pytest.raises(InvalidArgument) as info:
        collect_files(files)
    assert info.value.reason == reason


def test_collect_files_checks_the_expected_sha256():
    files = {"adapter_config.json": CONFIG, "adapter_model.safetensors": WEIGHTS}
    good = hashlib.sha256(WEIGHTS).hexdigest()
    assert collect_files(files, good.upper()).sha256 == good
    with pytest.raises(InvalidArgument) as info:
        collect_files(files, "f" * 64)
    assert info.value.reason == "SHA256_MISMATCH"


def test_store_round_trip_and_tamper_detection(tmp_path):
    store = AdapterStore(tmp_path)
    files = collect_files({"adapter_config.json": CONFIG, "adapter_model.safetensors": WEIGHTS})
    relative = store.save("bank", "support", files)
    assert relative == f"bank/support/{files.sha256}"
    assert store.save("bank", "support", files) == relative  # idempotent
    assert store.load("bank", "support", files.sha256) == files
    (tmp_path / relative / "adapter_model.safetensors").write_bytes(b"tampered")
    with pytest.raises(DataLoss) as info:
        store.load("bank", "support", files.sha256)
    assert info.value.reason == "SHA256_MISMATCH"


def test_store_never_builds_paths_from_bad_names(tmp_path):
    store = AdapterStore(tmp_path / "store")
    files = collect_files({"adapter_config.json": CONFIG, "adapter_model.safetensors": WEIGHTS})
    for name in ("../../outside", "..", "a/../../b"):
        with pytest.raises(InvalidArgument):
            store.save("bank", name, files)
    with pytest.raises(InvalidArgument):
        store.load("bank", "support", "../" * 10)
    assert [p.name for p in tmp_path.iterdir()] == ["store"]
