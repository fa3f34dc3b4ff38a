"""The continuous fine-tuning loop on one machine: measure, fine-tune a LoRA adapter, measure, canary.

    python examples/finetune_loop.py

The task is a house style a 135M model does not have and learns in 20 LoRA steps: every answer ends
with the sign-off ``-- Smol``. The metric checks it. The teacher's traces (here a scripted teacher,
standing in for a larger model: this machine has only SmolLM2-135M) become the training data;
``dspy.BootstrapFinetune`` trains an adapter with ``LocalLoRAProvider`` (PEFT in a child process),
llama.cpp's converter turns it into a GGUF adapter, and the provider's llama-server serves it beside
the base. Then a weighted canary (``Router``) sends a share of the traffic to the adapter.

First run: installs the training environment (~1 min) and llama.cpp's converter; later runs take
~2 minutes on 2 CPU cores (the training ~50 s).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import dspy

from dspy_anyscale import Anyscale, Router
from dspy_anyscale.finetune import LocalLoRAProvider
from dspy_anyscale.finetune._env import ensure_env
from dspy_anyscale.servers import llama_server

SIGN_OFF = "-- Smol"

TRAIN = {
    "What is the capital of France?": "Paris.",
    "How many legs does a spider have?": "Eight.",
    "What do bees make?": "Honey.",
    "What color is grass?": "Green.",
    "Which animal says moo?": "A cow.",
    "What is frozen water called?": "Ice.",
    "How many days are in a week?": "Seven.",
    "What is the opposite of hot?": "Cold.",
    "What do we breathe in to live?": "Oxygen.",
    "Which planet do we live on?": "Earth.",
    "What is 3 plus 4?": "Seven.",
    "What shape has three sides?": "A triangle.",
    "What do cows drink?": "Water.",
    "Which season comes after winter?": "Spring.",
    "What is the color of a ripe banana?": "Yellow.",
    "What gives us light during the day?": "The Sun.",
}
DEV = [
    "What is the capital of Italy?",
    "How many wheels does a bicycle have?",
    "What do cats like to drink?",
    "What color is the sky on a clear day?",
    "Which animal barks?",
    "What falls from clouds when it rains?",
    "How many months are in a year?",
    "What is the opposite of up?",
    "What do plants need to grow?",
    "Which is the largest ocean?",
    "What is 5 plus 5?",
    "What shape is a wheel?",
    "What do birds use to fly?",
    "Which season is the hottest?",
    "What color is snow?",
    "What do we use to see?",
]


class QA(dspy.Signature):
    """Answer the question in one short sentence."""

    question: str = dspy.InputField()
    answer: str = dspy.OutputField()


def signed_off(example: dspy.Example, prediction: dspy.Prediction, trace: Any = None) -> bool:
    """The metric: the answer ends with the house sign-off."""
    return str(getattr(prediction, "answer", "")).strip().endswith(SIGN_OFF)


@dataclass
class Loop:
    """What one run measured (seconds, scores in percent)."""

    baseline: float
    finetuned: float
    canary: float
    canary_share: float
    train_seconds: float
    base_answer: str
    adapter_answer: str


def scripted_teacher() -> dspy.BaseLM:
    """The teacher's answers, in the house style (a larger model's job in production)."""
    answers = {question: {"answer": f"{answer}\n\n{SIGN_OFF}"} for question, answer in TRAIN.items()}
    return dspy.utils.DummyLM(answers)


def evaluate(program: dspy.Module, questions: list[str]) -> float:
    devset = [dspy.Example(question=q).with_inputs("question") for q in questions]
    evaluator = dspy.Evaluate(devset=devset, metric=signed_off, num_threads=2, max_errors=len(devset) + 1)
    return float(evaluator(program).score)


def run_loop(
    lm: Anyscale,
    provider: LocalLoRAProvider,
    *,
    dev: list[str] = DEV,
    canary_weight: float = 0.25,
    train_kwargs: dict[str, Any] | None = None,
    say: Any = print,
) -> Loop:
    """Baseline, BootstrapFinetune, the fine-tuned score, a weighted canary; what it measured.

    ``lm``: the base model as users call it (here the stand-in llama-server), with ``provider``;
    ``dev``: the questions scored (none of them is in the training set); ``train_kwargs``: the
    provider's training options (steps, rank, threads, ...; docs/finetuning.md).
    """
    # DSPy's format, and no JSON-mode second try when a 135M model misses it: a miss scores 0.
    dspy.configure(adapter=dspy.ChatAdapter(use_json_adapter_fallback=False))
    student = dspy.Predict(QA)
    student.set_lm(lm)
    baseline = evaluate(student, dev)
    say(f"baseline   {baseline:5.1f}% of answers end with {SIGN_OFF!r}")

    teacher = dspy.Predict(QA)
    teacher.set_lm(scripted_teacher())
    trainset = [dspy.Example(question=q).with_inputs("question") for q in TRAIN]
    started = time.monotonic()
    optimizer = dspy.BootstrapFinetune(metric=signed_off, num_threads=1, train_kwargs=train_kwargs)
    tuned = optimizer.compile(student.deepcopy(), trainset=trainset, teacher=teacher)
    train_seconds = time.monotonic() - started
    adapter_lm = tuned.lm
    say(f"fine-tuned adapter {adapter_lm.adapter!r} in {train_seconds:.0f}s (train + convert + serve)")
    finetuned = evaluate(tuned, dev)
    say(f"fine-tuned {finetuned:5.1f}% of answers end with {SIGN_OFF!r}")

    base_lm = provider.base_lm(lm)  # the same server, every adapter at scale 0
    question = dev[0]
    base_answer = _answer(base_lm, question)
    adapter_answer = _answer(adapter_lm, question)
    say(f"{question!r}\n  base:    {base_answer!r}\n  adapter: {adapter_answer!r}")

    weights = {"base": 1 - canary_weight, "adapter": canary_weight}
    router = Router({"base": base_lm, "adapter": adapter_lm}, strategy="weighted", weights=weights)
    canary_program = dspy.Predict(QA)
    canary_program.set_lm(router)
    canary = evaluate(canary_program, dev)
    # The member that answered each call (the LMs' earlier, unrouted calls name their host instead).
    answered = [record.endpoint for record in router.usage if record.endpoint in weights]
    share = 100.0 * answered.count("adapter") / max(len(answered), 1)
    say(f"canary     {canary:5.1f}% ({share:.0f}% of {len(answered)} calls on the adapter, weight {canary_weight:.0%})")
    return Loop(baseline, finetuned, canary, share, train_seconds, base_answer, adapter_answer)


def _answer(lm: Any, question: str) -> str:
    program = dspy.Predict(QA)
    program.set_lm(lm)
    try:
        return str(program(question=question).answer)
    except Exception:  # the base model may not follow DSPy's format at all: show what it said
        return f"(not in DSPy's format) {lm.history[-1]['outputs'][0]}"


def main() -> None:
    dspy.disable_logging()  # the base model's unparseable answers would each log an error
    started = time.monotonic()
    # The stand-in base model, as users serve theirs; the provider serves the adapters beside it.
    with llama_server.start() as server, LocalLoRAProvider(python=ensure_env()) as provider:
        lm = Anyscale(
            model=server.alias,
            api_base=server.base_url,
            api_key="",
            use_chat_api=True,
            max_tokens=40,  # the styled answer is ~20 tokens; the base rambles until this
            cache=False,
            provider=provider,
        )
        run_loop(lm, provider)
    print(f"total      {time.monotonic() - started:.0f}s")


if __name__ == "__main__":
    main()
