"""Reading X-rays: where inputs live (storage) and how bytes become pixels (decode)."""
