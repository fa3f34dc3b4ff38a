"""A long run in a process of its own, for the tests that kill or interrupt it (and in-process, the
same program, data and LM for the run that resumes it).

    python tests/runs/job.py --base-url URL --output results.jsonl [--rows 300] [--threads 8] [--resume]
    python tests/runs/job.py ... --ray [--pool]      # on the Ray cluster at $RAY_ADDRESS, 2 actors

The key comes from ANYSCALE_API_KEY. Exit status 0 when the run completes.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import dspy

MODEL = "meta-llama/Llama-2-70b-chat-hf"  # in the catalogue: rows are priced


def data(rows: int) -> list[dspy.Example]:
    return [
        dspy.Example(question=f"question {i}", answer=f"answer for question {i}").with_inputs("question")
        for i in range(rows)
    ]


def program() -> dspy.Module:
    return dspy.ChainOfThought("question -> answer")


def make_lm(base_url: str, key: str | None = None):
    from dspy_anyscale import Anyscale

    key = key or os.environ["ANYSCALE_API_KEY"]
    return Anyscale(MODEL, api_base=base_url, api_key=key, use_chat_api=True, cache=False, num_retries=0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--rows", type=int, default=300)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--ray", action="store_true", help="dspy_anyscale.ray.run_program, 2 actors")
    parser.add_argument("--pool", action="store_true", help="with --ray: on a ProgramPool")
    parser.add_argument("--batch-size", type=int, default=5)
    args = parser.parse_args(argv)
    lm = make_lm(args.base_url)
    options = {"output": args.output, "resume": args.resume, "progress": not args.no_progress}
    if not args.ray:
        import dspy_anyscale

        dspy_anyscale.run_program(program(), data(args.rows), lm=lm, num_threads=args.threads, **options)
        return 0
    import ray

    from dspy_anyscale.ray import ProgramPool, run_program

    ray.init(address=os.environ["RAY_ADDRESS"], logging_level="ERROR", log_to_driver=False)
    sizes = {"concurrency": 2, "threads_per_actor": args.threads // 2}
    if args.pool:
        with ProgramPool(lm=lm, num_cpus=0.1, **sizes) as pool:
            run_program(program(), data(args.rows), pool=pool, batch_size=args.batch_size, **options)
    else:
        run_program(program(), data(args.rows), lm=lm, batch_size=args.batch_size, num_cpus=0.1, **sizes, **options)
    return 0


if __name__ == "__main__":
    sys.exit(main())
