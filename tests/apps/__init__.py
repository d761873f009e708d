"""The suite's own small services and the helper that runs `berth boot` around them."""
