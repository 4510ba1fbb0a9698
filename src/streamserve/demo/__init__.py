"""The card-fraud demo: synthetic entities and events, two trained model versions, an end-to-end run."""
