"""A CLIP-style two-tower model: MiniLM text tower + ViT image tower, zero-shot classifier.

The class prompts are stored tokenized in the model, so ``forward(pixel_values (B, 1, 28, 28))``
runs *both* towers and returns zero-shot logits ``(B, classes)``: the cosine similarity of each
image embedding with each class's mean prompt embedding, times a learned scale. Compressing either
tower (or both) therefore shows in the accuracy.
"""

from __future__ import annotations

import torch
from torch import nn

from slimformer.models.text import mean_pool

TRAIN_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.")
# never seen in training: the zero-shot check of generalization to new prompts
HELD_OUT_TEMPLATES = ("a black and white photo of the {}.", "this is a {}.",
                      "a small grey product shot of a {}.")
CLASS_NAMES = ("t-shirt", "pair of trousers", "pullover sweater", "dress", "coat", "sandal",
               "shirt", "sneaker", "bag", "ankle boot")
PROMPT_LEN = 16


def prompts(templates: tuple[str, ...]) -> list[str]:
    """Class-major prompt list: ``[t.format(c) for c in classes for t in templates]``."""
    return [t.format(c) for c in CLASS_NAMES for t in templates]


class TwoTower(nn.Module):
    """Text tower (encoder + projection) and image tower (ViT + projection), joint space ``dim``."""

    def __init__(self, text_encoder: nn.Module, image_encoder: nn.Module, image_width: int,
                 prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, dim: int = 128):
        super().__init__()
        self.text_encoder, self.image_encoder = text_encoder, image_encoder
        self.text_proj = nn.Linear(text_encoder.config.hidden_size, dim)
        self.image_proj = nn.Linear(image_width, dim)
        self.logit_scale = nn.Parameter(torch.tensor(2.659))  # log(1/0.07), as CLIP
        self.register_buffer("prompt_ids", prompt_ids, persistent=True)  # (C*K, T)
        self.register_buffer("prompt_mask", prompt_mask, persistent=True)  # (C*K, T)
        self.num_classes = len(CLASS_NAMES)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape of one image."""
        return (1, 28, 28)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``(N, T), (N, T) -> (N, dim)`` normalized text embeddings."""
        h = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return nn.functional.normalize(self.text_proj(mean_pool(h, attention_mask)), dim=-1)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(B, 1, 28, 28) -> (B, dim)`` normalized image embeddings."""
        return nn.functional.normalize(self.image_proj(self.image_encoder(pixel_values)), dim=-1)

    def class_embeddings(self) -> torch.Tensor:
        """Mean prompt embedding per class, renormalized: ``(classes, dim)``."""
        t = self.encode_text(self.prompt_ids, self.prompt_mask)
        t = t.reshape(self.num_classes, -1, t.shape[-1]).mean(1)
        return nn.functional.normalize(t, dim=-1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(B, 1, 28, 28) -> zero-shot logits (B, classes)``."""
        return self.logit_scale.exp() * self.encode_image(pixel_values) @ self.class_embeddings().T


@torch.no_grad()
def held_out_accuracy(model: TwoTower, dataset, batch: int = 500) -> dict[str, float]:
    """Zero-shot accuracy with the training templates only, the held-out ones only, and all."""
    from slimformer.data.text import tokenize

    model.eval()
    img = torch.cat([model.encode_image(dataset.inputs["pixel_values"][i:i + batch])
                     for i in range(0, len(dataset), batch)])
    out = {}
    for key, templates in (("train_templates", TRAIN_TEMPLATES),
                           ("held_out_templates", HELD_OUT_TEMPLATES),
                           ("all_templates", TRAIN_TEMPLATES + HELD_OUT_TEMPLATES)):
        enc = tokenize(prompts(templates), PROMPT_LEN)
        t = model.encode_text(enc["input_ids"], enc["attention_mask"])
        t = nn.functional.normalize(t.reshape(len(CLASS_NAMES), len(templates), -1).mean(1), dim=-1)
        out[key] = round(float(((img @ t.T).argmax(1) == dataset.labels).float().mean()), 4)
    return out
