"""How a round talks over Flower messages: the round shapes families use and the
strategy wrappers that must forward them."""
