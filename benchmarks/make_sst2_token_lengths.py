"""Write benchmarks/sst2_token_lengths.json: the token count of every SST-2 dev sentence and of the first 4,000
train sentences under SmolLM2's tokenizer (what benchmarks/gpu_protocol.py needs to give its random-weight model
prompts of SST-2's lengths without the data or a tokenizer on the GPU machine).

    python benchmarks/make_sst2_token_lengths.py      # needs ../shared/data and the smollm2-135m registry model
"""

import json
from pathlib import Path


def main():
    from iclgd.core.models import load_model
    from iclgd.core.tasks import TASKS, load_task, resolve_data_dir

    tok = load_model("smollm2-135m").tokenizer
    data = load_task(TASKS["sst2"], resolve_data_dir(None))
    count = lambda rows: [len(tok(data.spec.format_input(r), add_special_tokens=False)["input_ids"])  # noqa: E731
                          for r in rows]
    out = {"tokenizer": "smollm2-135m", "template": data.spec.template,
           "train": count(data.demo_pool[:4000]), "dev": count(data.eval_rows)}
    path = Path(__file__).with_name("sst2_token_lengths.json")
    path.write_text(json.dumps(out))
    print(f"wrote {path}: {len(out['train'])} train, {len(out['dev'])} dev lengths")


if __name__ == "__main__":
    main()
