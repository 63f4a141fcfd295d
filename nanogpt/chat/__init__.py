"""Chat: the ChatML template (template.py), conversation files (conversations.py), supervised fine-tuning
rows with assistant-only labels (sft.py), the `nanogpt chat` command (main.py) and GSM8K as a chat eval
(gsm8k.py)."""
