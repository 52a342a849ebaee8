"""Write the fuzz seeds of tests/fuzz/seeds/ that need torch (and safetensors) to make:

    python tests/fuzz/make_torch_seeds.py

tests/data holds one file of the legacy format and one safetensors file; the harnesses of
those formats start better from a few more shapes of them: legacy files of shared and
offset views, of every dtype and of a nested training checkpoint, and safetensors files of
many dtypes, shapes (0-d, empty) and names.  The tests do not need torch; only this does.
"""

import os

import torch

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seeds")


def main():
    torch.manual_seed(0)
    base = torch.arange(24, dtype=torch.float32)
    views = {"whole": base, "t": base.view(4, 6).t(), "offset": base[5:17:3],
             "expanded": base[:1].expand(3, 4), "scalar": torch.tensor(2.5)}
    dtypes = {str(d).split(".")[1]: torch.arange(6).to(d) for d in
              (torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.int64,
               torch.uint8, torch.bool, torch.complex64)}
    nested = {"epoch": 3, "model": {"bn.weight": torch.ones(4), "bn.running_var": torch.rand(4),
                                    "bn.num_batches_tracked": torch.tensor(7)},
              "optimizer": {"state": {0: {"momentum_buffer": torch.zeros(4)}},
                            "param_groups": [{"lr": 0.1, "params": [0]}]}}
    for name, value in (("views", views), ("dtypes", dtypes), ("nested", nested)):
        torch.save(value, os.path.join(OUT, f"legacy-{name}.pt"),
                   _use_new_zipfile_serialization=False)
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in views.items()} | {"empty": torch.zeros(0, 3)},
              os.path.join(OUT, "views.safetensors"))
    save_file({k: v for k, v in dtypes.items()}, os.path.join(OUT, "dtypes.safetensors"))


if __name__ == "__main__":
    main()
