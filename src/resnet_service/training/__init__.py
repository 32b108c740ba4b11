"""Fine-tuning on image folders (transfer learning) into a servable model bundle."""
