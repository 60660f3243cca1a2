"""Write tests/reference/trunk_reference.pt: what the ViT trunk computes for every research option, under
each pooling and for every pair of options, on fixed weights and inputs. tests/test_trunk_reference.py
rebuilds the same models with today's code and checks every output against these to 1e-6.

It was run once, on main at commit 5462088 (before the trunk was reshaped into one loop with hooks):

    python tests/reference/make_trunk_reference.py [OUT]     (OUT: another path to write, to compare)

so the tensors are a regression reference of the code as it was, not a hand-written result. Running it
again on the reshaped code must reproduce the file (it calls only the config surface, the model's
forward, and the pretraining methods: what a user calls).

Cases are composed from conf/ with Hydra overrides (the config surface is the interface the two codes
share), built small (16 px, patch 4, width 16, depth 3), and given weights by name: each state-dict tensor
is filled from a generator seeded by its name (cases.py, `fill_weights`), so the weights do not depend
on the order the modules are created in. A pair the configs refuse records its one-line message.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # the checkout's vitsweep/
sys.path.insert(0, str(HERE))

from cases import CASES, build_case, refusal, run_case

OUT = HERE / "trunk_reference.pt"


def main(out: Path = OUT) -> None:
    torch.set_num_threads(1)
    reference = {}
    for name, case in CASES.items():
        try:
            built = build_case(case)
        except Exception as err:  # noqa: BLE001 -- a refused combination: its one-line message is the reference
            reference[name] = {"overrides": case["overrides"], "error": refusal(err)}
            continue
        reference[name] = {"overrides": case["overrides"], "outputs": run_case(built, case)}
    torch.save(reference, out)
    refused = sum("error" in entry for entry in reference.values())
    print(f"{len(reference)} cases ({refused} refused) -> {out} ({out.stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT)
