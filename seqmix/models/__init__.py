"""Language-model assembly from mixers, generation and checkpoint import/export."""
