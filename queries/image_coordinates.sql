-- Where one image lives: its study object and its own gzip member, for
-- `python -m pipeline.fetch --uri URI --offset N --length M --sha256 HEX`.
SELECT storage.uri AS uri, storage.member_offset AS member_offset,
       storage.member_length AS member_length,
       storage.member_sha256 AS member_sha256
FROM `my-research-project.IRB41449.dicom_current`
WHERE sop_instance_uid = @sop_instance_uid
