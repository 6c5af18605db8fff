"""What is added to a model: peft adapters (LoRA and its kinds), embeddings, ControlNets (value, files, application)."""
