"""The adversarial examples every registry attack makes on a fixed model and fixed images, on a CPU with one thread:
what `test_attack.py` compares bit for bit with the examples recorded under the torchattacks release xfer used before
(`tests/data/attack-examples.safetensors`).

Record them again (after a deliberate change of what the attacks make) with
    python tests/attack_reference.py
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

RECORDED = Path(__file__).parent / "data" / "attack-examples.safetensors"
IMAGES = 3          # the first mnist5k test images
STEPS = 5


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Reductions split over threads add in another order: one thread gives the same bits every time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def cases() -> list[tuple[str, bool]]:
    from xfer import attack

    return [(name, targeted) for name in attack.list_attacks()
            for targeted in ((False, True) if attack.registered(name).targeted else (False,))]


def examples() -> dict[str, torch.Tensor]:
    """"<attack>/<targeted|untargeted>" → its examples, made on a seeded lenet5 and the first test images."""
    from xfer import attack, data, models
    from xfer.specs import AttackSpec

    test = data.load("mnist5k").test
    images, labels = test.images[:IMAGES], test.labels[:IMAGES]
    torch.manual_seed(0)
    model = models.build("lenet5", (1, 28, 28), 10).eval()
    made = {}
    with one_thread():
        for name, targeted in cases():
            spec = AttackSpec(attack=name, eps=0.3, steps=STEPS, targeted=targeted, seed=7)
            made[f"{name}/{'targeted' if targeted else 'untargeted'}"] = attack.generate(model, images, labels, spec,
                                                                                         device="cpu").contiguous()
    return made


def record() -> None:
    import torchattacks
    from safetensors.torch import save_file

    RECORDED.parent.mkdir(parents=True, exist_ok=True)
    save_file(examples(), RECORDED, metadata={"torchattacks": torchattacks.__version__, "torch": torch.__version__})
    print(f"recorded {RECORDED} (torchattacks {torchattacks.__version__}, torch {torch.__version__})")


if __name__ == "__main__":
    record()
