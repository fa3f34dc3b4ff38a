"""What a run was, written before its first row: so that a resumed run can tell whether the rows
already in an output belong to it.

A manifest records the program's predictors with their signatures (field names and types), the
input columns, how rows are identified (an id column, or a digest of the inputs) and the metric.
Rows made by another signature, from other inputs or scored by another metric cannot be mixed with
new ones, so a resume refuses them (``differences``). Instructions and demos are recorded as a
digest: a program an optimizer changed still makes rows of the same shape, so a change there is
only a warning.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import dspy
import orjson

from .. import _constants as C
from .rows import Metric


@dataclass(frozen=True)
class Manifest:
    signatures: tuple[tuple[str, dict[str, str], dict[str, str]], ...]  # (predictor, inputs, outputs): field -> type
    input_columns: tuple[str, ...]
    id_column: str | None  # None: row_id is a digest of the input fields
    metric: str | None  # the metric's name for an evaluation, else None
    program: str = ""  # the program's class, for messages
    prompts: str = ""  # a digest of the instructions and demos: a change is only a warning
    format: str = C.RUNS_MANIFEST_FORMAT
    version: int = C.RUNS_MANIFEST_VERSION

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self), option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE)

    @classmethod
    def from_json(cls, data: bytes | str, where: str) -> Manifest:
        """The manifest in ``data``; ``where`` names the file, for the error when it is not one."""
        try:
            value = orjson.loads(data)
            if not isinstance(value, dict) or value.get("format") != C.RUNS_MANIFEST_FORMAT:
                raise ValueError("not a run manifest")
            signatures = tuple((str(name), dict(ins), dict(outs)) for name, ins, outs in value["signatures"])
            return cls(
                signatures=signatures,
                input_columns=tuple(value["input_columns"]),
                id_column=value["id_column"],
                metric=value["metric"],
                program=str(value.get("program", "")),
                prompts=str(value.get("prompts", "")),
                version=int(value.get("version", C.RUNS_MANIFEST_VERSION)),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{where} is not a run manifest written by dspy_anyscale ({exc})") from exc


def manifest_of(
    program: dspy.Module, input_columns: Sequence[str], id_column: str | None, metric: Metric | None
) -> Manifest:
    return Manifest(
        signatures=tuple(_signature(name, predictor) for name, predictor in program.named_predictors()),
        input_columns=tuple(input_columns),
        id_column=id_column,
        metric=None if metric is None else metric_name(metric),
        program=type(program).__name__,
        prompts=_prompts_digest(program),
    )


def metric_name(metric: Metric) -> str:
    return str(getattr(metric, "__name__", None) or type(metric).__name__)


def differences(old: Manifest, new: Manifest) -> list[str]:
    """What changed between the run that wrote an output and this one, in words; empty if its rows belong."""
    changes = []
    if old.input_columns != new.input_columns:
        changes.append(f"the input columns were {list(old.input_columns)}, now {list(new.input_columns)}")
    if old.id_column != new.id_column:
        changes.append(f"rows were identified by {_id_words(old.id_column)}, now by {_id_words(new.id_column)}")
    if old.metric != new.metric:
        changes.append(f"the metric was {old.metric!r}, now {new.metric!r}")
    changes += _signature_changes(old.signatures, new.signatures)
    return changes


def _signature_changes(
    old: Sequence[tuple[str, dict[str, str], dict[str, str]]], new: Sequence[tuple[str, dict[str, str], dict[str, str]]]
) -> list[str]:
    old_names, new_names = [name for name, *_ in old], [name for name, *_ in new]
    if old_names != new_names:
        return [f"the program's predictors were {old_names}, now {new_names}"]
    changes = []
    for (name, old_in, old_out), (_, new_in, new_out) in zip(old, new, strict=True):
        for side, before, after in (("inputs", old_in, new_in), ("outputs", old_out, new_out)):
            if before != after:
                where = repr(name) if name else "the program"
                changes.append(f"the signature of {where} changed: {side} {_fields(before)}, now {_fields(after)}")
    return changes


def _fields(fields: Mapping[str, str]) -> str:
    return "(" + ", ".join(f"{name}: {kind}" for name, kind in fields.items()) + ")"


def _id_words(id_column: str | None) -> str:
    return "a digest of the input fields" if id_column is None else f"the column {id_column!r}"


def _signature(name: str, predictor: Any) -> tuple[str, dict[str, str], dict[str, str]]:
    signature = predictor.signature
    inputs = {field: _type_name(info.annotation) for field, info in signature.input_fields.items()}
    outputs = {field: _type_name(info.annotation) for field, info in signature.output_fields.items()}
    return name, inputs, outputs


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    return repr(annotation).replace("typing.", "")


def _prompts_digest(program: dspy.Module) -> str:
    parts = []
    for name, predictor in program.named_predictors():
        demos = [demo.toDict() if hasattr(demo, "toDict") else demo for demo in getattr(predictor, "demos", [])]
        parts.append([name, predictor.signature.instructions, demos])
    payload = orjson.dumps(parts, default=str, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)
    return hashlib.sha256(payload).hexdigest()[: C.RUNS_ROW_ID_DIGITS]
