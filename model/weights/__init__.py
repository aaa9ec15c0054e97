"""Every checkpoint layout: the published Wan2.2-S2V folder (+ LoRA), diffusers names, the encoders, the tiny bundle."""
