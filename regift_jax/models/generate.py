"""Generate text with any supported model, offline.

    python -m regift_jax.models.generate --model smollm2-135m-instruct \
        --prompt "What is the capital of France?" [--max_new_tokens 64] [--temperature 0]

``--model`` takes a preset name, a Hugging Face directory or a .gguf file.  Instruct models get
their chat template unless ``--no-chat``.
"""

from __future__ import annotations

import argparse
import sys
import time

from regift_jax import models
from regift_jax.models.tokenizer import TokenizerError


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m regift_jax.models.generate",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct",
                    help="preset name, HF directory or .gguf file (default: %(default)s)")
    ap.add_argument("--prompt", action="append", required=True,
                    help="prompt text; repeat the flag for a batch")
    ap.add_argument("--max_new_tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top_p", type=float, default=1.0)
    ap.add_argument("--top_k", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--no-chat", dest="chat", action="store_false",
                    help="feed the prompt raw instead of through the chat template")
    args = ap.parse_args(argv)
    t0 = time.time()
    try:
        m = models.load(args.model, dtype=args.dtype)
    except (models.CheckpointError, models.UnsupportedArchitectureError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t1 = time.time()
    outs = m.generate(args.prompt, max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                      seed=args.seed, chat=args.chat)
    t2 = time.time()
    for p, o in zip(args.prompt, outs):
        print(f"### prompt: {p}\n{o}\n")
    print(f"[loaded {m.cfg.name or args.model} in {t1 - t0:.1f}s; generated in {t2 - t1:.1f}s]",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
