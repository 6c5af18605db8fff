"""The adapter kinds, declared once (torch-free): what each is for, and how an auto learning rate treats it.

Training builds them in :mod:`..methods.lora` (peft's ``LoraConfig``, ``LoHaConfig``, ``LoKrConfig``, DoRA);
the loop's auto learning rate (``loop.session.resolve_auto``) reads :data:`LR_SCALE`.
"""
from __future__ import annotations

#: adapter kinds (peft's own configs) and what each is for; all save under kohya names that ComfyUI's LoraLoader,
#: A1111/Forge and LyCORIS read
KINDS = {
    "lora": "low-rank up @ down: the usual choice",
    "loha": "LyCORIS LoHa, the Hadamard product of two low-rank pairs: more capacity at the same rank and size",
    "lokr": "LyCORIS LoKr, a Kronecker product: the smallest files, good for styles",
    "dora": "DoRA, a LoRA whose weight is split into direction and a learned magnitude per input channel: closer "
            "to a full fine-tune at the same rank, a little larger and slower",
}
#: adapter kinds that learn slower than a LoRA at the same learning rate: kind -> (the factor an auto learning_rate
#: is multiplied by, why). Measured on the toy (benchmarks/bench_concepts.py --method lora --adapter lokr)
LR_SCALE = {"lokr": (4.0, "its Kronecker factor starts at zero and its updates are small at the same rate")}
