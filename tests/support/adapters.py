"""Adapters with a known effect, for testing the evaluation gate on the real model.

* :func:`fresh_adapter`: a freshly initialised LoRA (its B matrices are zero), i.e. exactly the base
  model's behaviour: a sound version the gate must accept.
* :func:`silencing_adapter`: a deliberately damaged LoRA that makes the model end every answer at
  once. It adapts only the last layer's MLP output projection and uses a LoRA bias: its A and B
  matrices are zero and the bias adds one constant vector to the residual stream, chosen (by a few
  dozen gradient steps on that vector alone, through the final norm and the output head) so that
  the end-of-sequence token becomes the most probable next token whatever the context. Every answer
  is then empty: instruction following collapses and so does any environment's pass rate. It is made
  in about a second, without training the model, and answers cost one decoding step.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch


def _load(model_path: str | Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_path))
    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32)
    return tok, model


def fresh_adapter(model_path: str | Path, out_dir: str | Path, rank: int = 8, seed: int = 0) -> Path:
    """Save a freshly initialised LoRA (all linear layers, rank ``rank``) for the model in ``out_dir``."""
    from peft import LoraConfig, get_peft_model

    _, model = _load(model_path)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", task_type="CAUSAL_LM"))
    peft_model.save_pretrained(str(out_dir))
    return Path(out_dir)


def silencing_adapter(model_path: str | Path, out_dir: str | Path, strength: float = 1000.0, steps: int = 60) -> Path:
    """Save the damaged adapter of the module docstring in ``out_dir``."""
    from peft import LoraConfig, get_peft_model

    tok, model = _load(model_path)
    eos = int(tok.eos_token_id)
    head = model.get_output_embeddings().weight.detach()
    norm = model.model.norm.weight.detach()
    # The direction whose RMS-normalised image the output head maps to the end token most confidently.
    vec = (norm * model.get_input_embeddings().weight[eos].detach()).clone().requires_grad_(True)
    opt = torch.optim.Adam([vec], lr=0.1)
    for _ in range(steps):
        logp = torch.log_softmax(head @ (norm * vec / vec.pow(2).mean().sqrt()), -1)[eos]
        opt.zero_grad()
        (-logp).backward()
        opt.step()
    last = model.config.num_hidden_layers - 1
    config = LoraConfig(r=1, lora_alpha=1, target_modules=["down_proj"], layers_to_transform=[last], lora_bias=True, task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # peft warns that a bias on a bias-free layer cannot be merged: it is not merged
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            if name.endswith("lora_B.default"):
                module.weight.zero_()
                module.bias.copy_(strength * vec.detach() / vec.detach().norm())
            elif name.endswith("lora_A.default"):
                module.weight.zero_()
    with warnings.catch_warnings():  # ... and mistakes the 1-D bias for an unsharded tensor
        warnings.simplefilter("ignore")
        peft_model.save_pretrained(str(out_dir))
    return Path(out_dir)
