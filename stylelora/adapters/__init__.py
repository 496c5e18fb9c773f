"""Adapters: which modules get LoRA, injection through PEFT, conversion to kohya's layout."""
