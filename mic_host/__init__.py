"""mic_host package."""
