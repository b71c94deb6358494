"""The intermediate representations: scalar expressions, the Cascade IR and the Tile IR."""
