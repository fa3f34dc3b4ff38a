"""Train one LoRA adapter with PEFT; the script :class:`~dspy_anyscale.finetune.LocalLoRAProvider` runs.

It runs in the *training* interpreter (the one with the ``[finetune]`` packages: torch,
transformers, peft, gguf), as ``python _train_lora.py <spec.json>``, never imported by the package:
it imports nothing of ``dspy_anyscale``, so that interpreter needs only the training packages.

The spec (JSON, written by the provider) says::

    base_gguf      the GGUF the local llama-server serves (transformers dequantizes it to float32)
    base_cache     optional: a directory for the dequantized base (model and tokenizer, saved with
                   save_pretrained under <base_cache>/<sha256 of the GGUF>); later jobs load it from
                   there (measured 0.8 s instead of 36-44 s for SmolLM2-135M on 2 cores)
    data           a JSON-lines file of {"messages": [...]} conversations
    output         a directory: <output>/adapter (PEFT's adapter_model.safetensors + adapter_config.json)
                   and <output>/base/config.json (the base's config, what convert_lora_to_gguf.py reads)
    steps, rank, alpha, dropout, learning_rate, seed, max_length, batch_size, target_modules, threads

The loss counts the assistant's tokens only: the prompt (system and user turns, and the template's
markup before each answer) is masked, so the adapter learns how to answer, not how to ask. Lines
on stdout are progress (the provider keeps them in the job's log); exit status 0 means the adapter
and the config are written, anything else is a failure whose reason is the log's tail.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any


def _ignore_index() -> int:
    """The label the loss skips (torch's cross-entropy default, which transformers' models use)."""
    import torch  # type: ignore[import-not-found,unused-ignore]  # the training interpreter has it

    return int(torch.nn.CrossEntropyLoss().ignore_index)


def _say(message: str) -> None:
    print(message, flush=True)


def _load(spec: dict[str, Any]) -> tuple[Any, Any]:
    import torch  # type: ignore[import-not-found,unused-ignore]  # the training interpreter has it
    from transformers import (  # type: ignore[import-not-found,unused-ignore]  # the training interpreter has it
        AutoModelForCausalLM,
        AutoTokenizer,
    )

    gguf = Path(spec["base_gguf"])
    cached = _cached_base(gguf, spec.get("base_cache"))
    started = time.monotonic()
    if cached is not None and (cached / _COMPLETE).is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(cached))
        model = AutoModelForCausalLM.from_pretrained(str(cached), torch_dtype=torch.float32)
        _say(f"loaded {gguf.name} from {cached} ({time.monotonic() - started:.1f}s)")
        return tokenizer, model
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, torch_dtype=torch.float32)
    _say(f"loaded {gguf.name} ({time.monotonic() - started:.1f}s)")
    if cached is not None:
        _keep_base(cached, tokenizer, model)
    return tokenizer, model


# Written last: a directory without it is a save that did not finish (never loaded).
_COMPLETE = "COMPLETE"


def _cached_base(gguf: Path, root: str | None) -> Path | None:
    """Where the dequantized copy of ``gguf`` lives under ``root``: named by the GGUF's content."""
    if not root:
        return None
    digest = hashlib.sha256()
    with gguf.open("rb") as source:
        for chunk in iter(lambda: source.read(1 << 20), b""):
            digest.update(chunk)
    return Path(root) / digest.hexdigest()[:32]


def _keep_base(target: Path, tokenizer: Any, model: Any) -> None:
    """Save the dequantized base for the next job; staged and renamed, so a reader sees all or nothing."""
    staged = target.with_name(f".{target.name}-{os.getpid()}")
    try:
        shutil.rmtree(staged, ignore_errors=True)
        tokenizer.save_pretrained(str(staged))
        model.save_pretrained(str(staged), safe_serialization=True)
        (staged / _COMPLETE).write_text("")
        staged.rename(target)  # another job may have won the race: its copy is as good
        _say(f"kept the dequantized base in {target}")
    except OSError as exc:  # a full disk or a read-only cache costs the next job time, never this one
        _say(f"could not keep the dequantized base in {target}: {exc}")
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def _render(tokenizer: Any, messages: list[dict[str, str]], *, generation_prompt: bool) -> str:
    """The text llama-server makes of ``messages`` (the GGUF's chat template; ChatML if it has none)."""
    if getattr(tokenizer, "chat_template", None):
        text: str = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        return text
    parts = [f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages]
    return "".join(parts) + ("<|im_start|>assistant\n" if generation_prompt else "")


def _encode(
    tokenizer: Any, messages: list[dict[str, str]], max_length: int, ignore: int
) -> tuple[list[int], list[int]]:
    """Token ids and labels: each assistant turn's tokens are labelled, everything else is masked."""
    ids: list[int] = []
    labels: list[int] = []
    done = ""
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:index], generation_prompt=True)
        answered = _render(tokenizer, messages[: index + 1], generation_prompt=False)
        prompt_ids = tokenizer(prompt[len(done) :], add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(answered[len(prompt) :], add_special_tokens=False)["input_ids"]
        ids += prompt_ids + answer_ids
        labels += [ignore] * len(prompt_ids) + answer_ids
        done = answered
    # Keep the end (the answer) when a conversation is too long: the start is the instructions.
    return ids[-max_length:], labels[-max_length:]


def _batches(examples: list[tuple[list[int], list[int]]], spec: dict[str, Any]) -> Any:
    """Endless shuffled batches (seeded), padded on the right."""
    import torch  # type: ignore[import-not-found,unused-ignore]  # the training interpreter has it

    rng = random.Random(spec["seed"])
    order: list[int] = []
    while True:
        batch = []
        for _ in range(spec["batch_size"]):
            if not order:
                order = list(range(len(examples)))
                rng.shuffle(order)
            batch.append(examples[order.pop()])
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.zeros((len(batch), width), dtype=torch.long)
        labels = torch.full((len(batch), width), _ignore_index(), dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (ids, labs) in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, : len(labs)] = torch.tensor(labs)
            mask[row, : len(ids)] = 1
        yield input_ids, labels, mask


def _train(spec: dict[str, Any], tokenizer: Any, model: Any) -> Any:
    import torch  # type: ignore[import-not-found,unused-ignore]  # the training interpreter has it
    from peft import (  # type: ignore[import-not-found,unused-ignore]  # the training interpreter has it
        LoraConfig,
        get_peft_model,
    )

    config = LoraConfig(
        r=spec["rank"],
        lora_alpha=spec["alpha"],
        lora_dropout=spec["dropout"],
        target_modules=list(spec["target_modules"]),
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    conversations = [json.loads(line)["messages"] for line in Path(spec["data"]).read_text().splitlines() if line]
    ignore = _ignore_index()
    examples = [_encode(tokenizer, messages, spec["max_length"], ignore) for messages in conversations]
    examples = [(ids, labels) for ids, labels in examples if any(label != ignore for label in labels)]
    if not examples:
        raise SystemExit("no example has an assistant answer left after truncation: raise max_length")
    _say(f"training: {len(examples)} examples, {spec['steps']} steps, r={spec['rank']}, lr={spec['learning_rate']}")
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=spec["learning_rate"])
    peft_model.train()
    batches = _batches(examples, spec)
    started = time.monotonic()
    for step in range(1, spec["steps"] + 1):
        input_ids, labels, mask = next(batches)
        loss = peft_model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        _say(f"step {step}/{spec['steps']} loss {loss.item():.4f} ({time.monotonic() - started:.1f}s)")
    return peft_model


def _save(spec: dict[str, Any], model: Any, peft_model: Any) -> None:
    output = Path(spec["output"])
    peft_model.save_pretrained(str(output / "adapter"), safe_serialization=True)
    # convert_lora_to_gguf.py reads the base's architecture and shapes from config.json alone.
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(str(output / "base"))
    # Name the base by its directory, never a hub id: the converter must not go to the network.
    adapter_config = output / "adapter" / "adapter_config.json"
    values = json.loads(adapter_config.read_text())
    values["base_model_name_or_path"] = str(output / "base")
    adapter_config.write_text(json.dumps(values, indent=2) + "\n")
    _say(f"saved adapter to {output / 'adapter'}")


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python _train_lora.py <spec.json>", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[1]).read_text())
    import torch  # type: ignore[import-not-found,unused-ignore]  # the training interpreter has it

    torch.manual_seed(spec["seed"])
    torch.set_num_threads(spec["threads"])
    tokenizer, model = _load(spec)
    peft_model = _train(spec, tokenizer, model)
    _save(spec, model, peft_model)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
