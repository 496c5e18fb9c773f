"""Model families: what differs between the models stylelora trains, one folder each (base.py
says what a family answers; registry.py lists them), and loading a model as its family."""

from __future__ import annotations

from stylelora.families.base import ModelFamily
from stylelora.families.loading import detect_family, load_family, load_pipeline
from stylelora.families.registry import FAMILIES

__all__ = ["FAMILIES", "ModelFamily", "detect_family", "load_family", "load_pipeline"]
