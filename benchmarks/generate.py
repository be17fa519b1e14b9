"""Generation throughput: this project's sampler vs transformers ``generate`` (same model, prompts,
batch, greedy, same number of new tokens), on this machine, in one run.

    python benchmarks/generate.py [--batch 8] [--new_tokens 64] [--repeats 2]

Tokens/s counts generated tokens (batch x new tokens, EOS disabled so both run the full length).
The JAX figure excludes compilation (one warm-up call); the PyTorch figure excludes the first call
too.  Prints both figures and the ratio; prints the load average, since the machine may be shared.
"""

import argparse
import json
import os
import time

from regift_jax.core import configs_util  # no JAX import: the XLA flags go first


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--prompt_words", type=int, default=48)
    ap.add_argument("--torch_threads", type=int, default=0, help="0 = torch default")
    ap.add_argument("--json", default="")
    ap.add_argument("--xla_cpu_flags", default="config",
                    help=configs_util.XLA_CPU_FLAGS_HELP)
    a = ap.parse_args()
    xla_flags = configs_util.apply_cli_xla_cpu_flags(a.xla_cpu_flags)
    print(f"XLA_FLAGS={xla_flags!r}", flush=True)

    # lazy: JAX starts with these imports, after the XLA flags above are set
    import jax
    from regift_jax import models
    from regift_jax.models.sampling import Sampler, SamplingConfig

    m = models.load("smollm2-135m-instruct")
    tok = m.tokenizer
    base = ("Context: The Normans were the people who in the 10th and 11th centuries gave their "
            "name to Normandy, a region in France. They were descended from Norse raiders and "
            "pirates from Denmark, Iceland and Norway. ").split()
    prompts = []
    for i in range(a.batch):
        words = (base * 4)[: a.prompt_words - 4 * i]
        prompts.append(m.chat_prompt(" ".join(words) + f" Question {i}: who were the Normans?"))
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]

    # EOS disabled on both sides so every row generates exactly new_tokens tokens.
    s = Sampler(m.cfg, m.params, tok, batch_size=a.batch, eos_ids=(-1,), chunk=a.new_tokens)
    sc = SamplingConfig(max_new_tokens=a.new_tokens)
    s.generate(ids, sc)  # compile
    t = []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        out = s.generate(ids, sc)
        t.append(time.perf_counter() - t0)
    n_tok = sum(g.generated_tokens for g in out)
    jax_tps = n_tok / min(t)

    # lazy: the baseline's optional test dependencies
    import torch
    import transformers
    from regift_jax.models.tokenizer import smollm2_gguf_path
    if a.torch_threads:
        torch.set_num_threads(a.torch_threads)
    path = smollm2_gguf_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    kw = dict(max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, do_sample=False,
              pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        hf.generate(**enc, **kw)
        tt = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            o = hf.generate(**enc, **kw)
            tt.append(time.perf_counter() - t0)
    hf_tok = (o.shape[1] - enc["input_ids"].shape[1]) * a.batch
    hf_tps = hf_tok / min(tt)
    res = {"batch": a.batch, "new_tokens": a.new_tokens,
           "prompt_tokens": [len(x) for x in ids], "regift_jax_tokens_per_s": round(jax_tps, 1),
           "transformers_tokens_per_s": round(hf_tps, 1), "ratio": round(jax_tps / hf_tps, 2),
           "loadavg": os.getloadavg(), "xla_flags": xla_flags, "jax": jax.__version__,
           "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    print(json.dumps(res, indent=1))
    print(f"regift_jax sampler: {jax_tps:.1f} tok/s | transformers generate: {hf_tps:.1f} tok/s "
          f"| ratio {jax_tps / hf_tps:.2f}x (goal >= 10x)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
