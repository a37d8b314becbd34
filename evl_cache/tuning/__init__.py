"""Tuning CLIP's towers online on decoded clips: ViFi-CLIP's fine-tuning and bridge and prompt (`finetune`)."""
