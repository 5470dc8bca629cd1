"""The adapter loader's download: a version's adapter_uri is a folder, with or without its trailing '/'."""

from __future__ import annotations

from oel.schemas import ModelVersion, VersionStatus
from oel.store import LocalStore
from producers.adapters import AdapterLoader


def version(uri: str) -> ModelVersion:
    return ModelVersion(
        namespace="shop", version="v1", adapter_uri=uri, base_model="m", base_model_hash="sha256:0", status=VersionStatus.promoted
    )


def test_the_adapter_folder_is_copied_under_the_cache_only(tmp_path):
    store = LocalStore(tmp_path / "store")
    store.put_bytes("adapters/shop/v1/adapter_config.json", b"{}")
    store.put_bytes("adapters/shop/v1/sub/weights.bin", b"w")
    store.put_bytes("adapters/shop/v10/adapter_config.json", b"other")  # a sibling sharing the name's start
    loader = AdapterLoader(backend=None, store=store, cache_dir=tmp_path / "cache")  # the download needs no backend
    for uri in ("adapters/shop/v1", "adapters/shop/v1/"):  # without the trailing '/', files once landed in '/'
        out = loader._download(version(uri))
        assert out == (tmp_path / "cache" / "shop" / "v1").resolve()
        assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == ["adapter_config.json", "sub/weights.bin"]
        assert (out / "adapter_config.json").read_bytes() == b"{}"
