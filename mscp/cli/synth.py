"""`mscp synth`: a synthetic base/aligned/adapter trio in real transformers and peft formats."""
from __future__ import annotations

import json

HELP = "write a synthetic base/aligned/adapter trio"


def add_arguments(p) -> None:
    from mscp.harness.synth import FAMILIES, PRESETS, SynthSpec

    d = SynthSpec()
    p.add_argument("--out", required=True, help="folder to write base/, aligned/ and adapter/ into")
    p.add_argument("--preset", choices=sorted(PRESETS), help="real layer shapes (sets hidden, intermediate, heads, "
                   "kv-heads, vocab; --n-layers still chooses how many layers)")
    p.add_argument("--family", choices=sorted(FAMILIES), default=d.family, help=f"architecture (default {d.family})")
    p.add_argument("--hidden", type=int, default=d.hidden_size, help=f"hidden size (default {d.hidden_size})")
    p.add_argument("--intermediate", type=int, default=d.intermediate_size,
                   help=f"MLP size (default {d.intermediate_size})")
    p.add_argument("--n-layers", type=int, default=d.num_hidden_layers,
                   help=f"number of decoder layers (default {d.num_hidden_layers})")
    p.add_argument("--heads", type=int, default=d.num_attention_heads,
                   help=f"attention heads (default {d.num_attention_heads})")
    p.add_argument("--kv-heads", type=int, default=d.num_key_value_heads,
                   help=f"key/value heads (default {d.num_key_value_heads})")
    p.add_argument("--vocab", type=int, default=d.vocab_size, help=f"vocabulary size (default {d.vocab_size})")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=d.dtype,
                   help=f"checkpoint dtype (default {d.dtype})")
    p.add_argument("--rank", type=int, default=d.rank, help=f"LoRA rank (default {d.rank})")
    p.add_argument("--layers-per-shard", type=int, default=d.layers_per_shard,
                   help=f"decoder layers per safetensors shard (default {d.layers_per_shard})")
    p.add_argument("--max-shard-mb", type=int, default=d.max_shard_bytes >> 20, help="split shards above this size")
    p.add_argument("--seed", type=int, default=d.seed, help=f"random seed (default {d.seed})")


def run(args) -> int:
    from tqdm.auto import tqdm

    from mscp.harness.synth import PRESETS, SynthSpec, write_trio

    shape = dict(hidden_size=args.hidden, intermediate_size=args.intermediate, num_attention_heads=args.heads,
                 num_key_value_heads=args.kv_heads, vocab_size=args.vocab)
    if args.preset:
        shape = dict(PRESETS[args.preset])
    spec = SynthSpec(family=args.family, num_hidden_layers=args.n_layers, dtype=args.dtype, rank=args.rank,
                     layers_per_shard=args.layers_per_shard, max_shard_bytes=args.max_shard_mb << 20, seed=args.seed,
                     **shape)
    paths = write_trio(args.out, spec, progress=lambda it, **kw: tqdm(it, **kw))
    print(json.dumps({k: str(v) for k, v in paths.items()}))
    return 0
