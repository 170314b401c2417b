"""mic_card package."""
