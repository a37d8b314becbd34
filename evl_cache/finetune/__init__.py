"""Fine-tuning CLIP's towers online on decoded clips: ViFi-CLIP's training (`evl-cache finetune`)."""
