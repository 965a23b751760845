"""Model layer: configs, layer ranges, partial weight loading, tokenizers. numpy + stdlib only."""
