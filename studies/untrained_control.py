"""What the untrained control of a world model answers (issue 23): trained, re-initialised blocks (Deutch et al.'s
control, iclgd's default) and re-initialised blocks and embeddings (``--untrained-reinit all``), each measured by
ZSL on the fixed tasks against its null over 64 random label assignments and by ICL on the fixed tasks and on fresh
random assignments.

    python studies/untrained_control.py runs/along/deep-s1/model runs/along/deep-s2/model ...
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(folders: list[str]) -> None:
    import json

    from iclgd.core.models import load_model
    from iclgd.engine.finetune import reinit_untrained
    from iclgd.engine.world import World, WorldTrainConfig, evaluate_proxy, zsl_null

    print("| model | control | probe ICL (fixed tasks) | ICL fresh assignments | ZSL fixed | ZSL null (64) | "
          "P(null >= fixed) |")
    print("|---|---|---|---|---|---|---|")
    for f in folders:
        cfg = WorldTrainConfig.from_dict(json.loads((Path(f).parent / "train_config.json").read_text()))
        world = World(cfg.world)
        for control in ("trained", "blocks", "all"):
            lm = load_model(f)
            if control != "trained":
                reinit_untrained(lm, seed=0, what=control)
            p, z = evaluate_proxy(lm, world, 512), zsl_null(lm, world)
            print(f"| {Path(f).parent.name} | {control} | {p['icl_acc']:.3f} | {z['icl_random_assignments']:.3f} | "
                  f"{z['fixed_mean']:.3f} | {z['null_mean']:.3f} ± {z['null_sd']:.3f} | "
                  f"{z['p_null_set_mean_at_least_fixed']:.2f} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
