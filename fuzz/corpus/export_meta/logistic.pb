r
graft.format1r,
graft.labels["cat_or_cup","dog_or_bird"]r
graft.threshold0.5r
graft.outputprobabilitiesr

graft.headlogisticr¶
graft.preprocess¡{"name":"input","layout":"NCHW","channels":"RGB","size":224,"resize_shorter":256,"resize_filter":"bilinear","mean":[127.0,127.0,127.0],"std":[128.0,128.0,128.0]}r)
graft.backboneefficientnet-lite0-fp32rY
graft.backbone_sha256@10c08c0b916f10de12d5a3f14b875fd1f626d47cc023e7dca08d8f29fad3a071r÷
graft.preprocess_docÞdecode to RGB honouring EXIF orientation; resize shorter side to 256 (bilinear, antialiased as Pillow); centre crop 224; (x - mean) / std per channel with mean [127.0, 127.0, 127.0], std [128.0, 128.0, 128.0]; NCHW float32