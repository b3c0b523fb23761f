"""The vision encoder service: images in, a claim check on the encoded prompt out."""
