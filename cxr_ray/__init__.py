"""cxr-ray: distributed chest X-ray screening on Ray."""
