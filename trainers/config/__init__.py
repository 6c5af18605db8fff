"""Options and recipes: every training option declared once, for the node, config.json and the shell (torch-free)."""
