"""What a run leaves: output roots and their ledger, a training run folder, the table."""
