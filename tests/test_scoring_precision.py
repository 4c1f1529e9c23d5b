"""Option scores in fp32/fp64 whatever the model dtype (a bf16 LM head ties or flips close options)."""

import torch

from iclgd.core.models import load_model
from iclgd.core.tasks import TASKS
from iclgd.engine.scoring import build_prompts, score_options

ROWS = [{"text": "a fine film", "label": 1}, {"text": "dull", "label": 0}, {"text": "so so", "label": 0}]


def test_bf16_model_scores_with_an_fp32_head_and_fp64_log_softmax():
    lm = load_model("tiny-random-llama")
    lm.model.to(torch.bfloat16)
    p = build_prompts(lm, TASKS["sst2"], ROWS[:2], ROWS)
    got = score_options(lm, p, reuse_prefix=False)
    head = lm.model.get_output_embeddings()
    for i, q in enumerate(p.query_ids):
        for c, o in enumerate(p.option_ids):
            ids = torch.tensor([p.prefix_ids + q + o])
            with torch.no_grad():
                h = lm.model.base_model(input_ids=ids).last_hidden_state[0]  # bf16, as the model computes it
            start = len(p.prefix_ids) + len(q) - 1
            logits = h[start: start + len(o)].double() @ head.weight.double().T  # the reference, in fp64
            want = torch.log_softmax(logits, -1)[torch.arange(len(o)), torch.tensor(o)].mean().item()
            naive = torch.log_softmax(head(h[start: start + len(o)]), -1)  # bf16 head and log-softmax
            naive = naive[torch.arange(len(o)), torch.tensor(o)].float().mean().item()
            assert abs(got[i, c] - want) < 1e-5  # fp32 head: exact up to fp32 rounding of the logits
            assert abs(naive - want) > abs(got[i, c] - want)  # what the bf16 path would have lost
