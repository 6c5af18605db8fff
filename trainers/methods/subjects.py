"""A DreamBooth subject (``FT_SUBJECTS`` is a list of them): its pictures, prompts and optional class pictures. Its own
module so that DreamBooth and its class pictures (``class_pictures``) both read it."""
from __future__ import annotations

from dataclasses import dataclass

from ..data.dataset import Dataset


@dataclass
class Subject:
    """One subject of a DreamBooth run (``FT_SUBJECTS`` is a list of them)."""

    dataset: Dataset
    instance_prompt: str
    class_prompt: str
    class_dataset: Dataset | None = None

    @property
    def identifier(self) -> str:
        """The words of the instance prompt that the class prompt lacks ("a sks star" vs "a star" -> "sks")."""
        cls = set(self.class_prompt.lower().split())
        return " ".join(w for w in self.instance_prompt.split() if w.lower() not in cls) or self.instance_prompt
