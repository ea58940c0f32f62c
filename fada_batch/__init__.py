"""fada-batch: LoRA fine-tuning of BLIP-2 on fetal ultrasound VQA, one adapter per category."""

__version__ = "0.1.0"
