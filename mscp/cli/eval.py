"""`mscp eval`: generate on prompt sets, judge, report safety and utility figures."""
from __future__ import annotations

HELP = "evaluate a model (+ adapter): keyword ASR, judge refusal rate, over-refusal, task accuracy"


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="model folder")
    p.add_argument("--adapter", default=None, help="peft LoRA adapter folder (merged for generation)")
    p.add_argument("--harmful", required=True, metavar="FILE", help="harmful prompts (.txt/.jsonl/.csv)")
    p.add_argument("--benign", metavar="FILE", help="benign prompts: over-refusal")
    p.add_argument("--task", metavar="FILE", help="task prompts, .jsonl with prompt and answer: task accuracy")
    p.add_argument("--robust", metavar="FILE", help="a robustness split (harmful_robust.jsonl, written by `mscp demo` "
                   "beside harmful_eval.txt): robust_keyword_asr and robust_judge_refusal_rate, and per style")
    p.add_argument("--judge", default="keyword", help="keyword | embedding | llm | llm:MODEL_DIR | none (default keyword)")
    p.add_argument("--json", metavar="OUT", help="write the figures (and responses) as JSON")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens generated per prompt (default 32)")
    p.add_argument("--batch-size", type=int, default=64, help="prompts per generation batch (default 64)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="float32",
                   help="generation dtype (default float32: bf16 is emulated, and slower, on CPUs without it)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args) -> int:
    from mscp.harness.evaluate import run_eval_cli

    return run_eval_cli(args)
