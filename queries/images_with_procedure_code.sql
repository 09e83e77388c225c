-- Every image with a given requested procedure code (parameter code) in any item of
-- its RequestedProcedureCodeSequence, not only the first.
SELECT entity_id, sop_instance_uid, storage.uri AS uri
FROM `my-research-project.IRB41449.dicom_current`
WHERE EXISTS (
  SELECT 1
  FROM UNNEST(JSON_QUERY_ARRAY(metadata, '$.RequestedProcedureCodeSequence'))
       AS procedure
  WHERE JSON_VALUE(procedure, '$.CodeValue') = @code)
ORDER BY sop_instance_uid
