"""Greedy-decode a finetune_lm run's exported models in Hugging Face ``transformers`` and
compare with the run's own greedy decodes (a check, not a test: it needs torch and
transformers, which the project does not require).

    python scripts/check_hf_export.py /work/runs/finetune_e2e --seed 0 [--models lora,bdia]
        [--mrs 50]

For each model it loads ``<seed>/<model>/hf`` with ``AutoModelForCausalLM`` (float32),
greedy-decodes the run's BLEU prompts (the first ``--mrs``) with the run's ``max_new``
tokens, cuts each at the end-of-text token as the run does, and prints how many texts equal
the run's ``decodes_greedy`` and the first that differs. A BDIA model with
``quantize_at_inference`` decodes on its grid in the run and off it in ``transformers``
(the exported network is the standard one): rare differences there are that rounding.
"""
import argparse
import json
import pathlib
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # bdia_jax, experiments
import ml_collections
import torch
import transformers

from experiments import finetune_gpt2, finetune_lm


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("workdir", help="the --workdir of a finetune_lm run (E2E format)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", default="", help="comma-separated (default: every "
                        "finished model of the seed)")
    parser.add_argument("--mrs", type=int, default=50, help="the first N BLEU prompts")
    args = parser.parse_args()
    workdir = pathlib.Path(args.workdir)
    config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    if config.data.format != "e2e":
        sys.exit(f"{workdir}: data.format={config.data.format!r}; only E2E runs have "
                 f"greedy decodes to compare.")
    with tempfile.TemporaryDirectory() as scratch:
        data = finetune_lm.load_lm_data(config, scratch)
    results = workdir / f"seed_{args.seed}" / "checkpoints"
    names = args.models.split(",") if args.models else sorted(
        p.name[:-len("_result.json")] for p in results.glob("*_result.json"))
    eos, max_new = data.tokenizer.eos_id, finetune_gpt2.new_token_budget(config, data)
    prompts = data.bleu_prompts[:args.mrs]
    for name in names:
        result = json.loads((results / f"{name}_result.json").read_text())
        model = transformers.AutoModelForCausalLM.from_pretrained(
            result["hf_folder"], dtype=torch.float32).eval()
        same, first_diff = 0, None
        for i, prompt in enumerate(prompts):
            with torch.no_grad():
                out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new,
                                     do_sample=False, eos_token_id=eos, pad_token_id=eos)
            text = data.tokenizer.decode(out[0, len(prompt):].tolist()).strip()
            if text == result["decodes_greedy"][i]:
                same += 1
            elif first_diff is None:
                first_diff = (data.bleu_mrs[i], result["decodes_greedy"][i], text)
        print(f"{name}: {same}/{len(prompts)} greedy texts equal the run's "
              f"({result['hf_folder']})", flush=True)
        if first_diff:
            mr, ours, theirs = first_diff
            print(f"  first difference, {mr}:\n    run:          {ours!r}\n"
                  f"    transformers: {theirs!r}")


if __name__ == "__main__":
    main()
