"""Task nodes (blocks) backed by diffusers/transformers. Importing this package stays light: the block
modules are imported by the registry on first use."""
