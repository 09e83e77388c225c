-- Two sequence levels deep: every image with a requested procedure whose
-- modifier (ProcedureCodeSequence inside RequestedProcedureCodeSequence)
-- means the parameter meaning ('left', 'right').
SELECT entity_id, sop_instance_uid,
       JSON_VALUE(metadata, '$.RequestedProcedureCodeSequence[0].CodeValue')
         AS first_procedure_code
FROM `my-research-project.IRB41449.dicom_current`
WHERE EXISTS (
  SELECT 1
  FROM UNNEST(JSON_QUERY_ARRAY(metadata, '$.RequestedProcedureCodeSequence'))
       AS procedure,
       UNNEST(JSON_QUERY_ARRAY(procedure, '$.ProcedureCodeSequence'))
       AS modifier
  WHERE JSON_VALUE(modifier, '$.CodeMeaning') = @meaning)
ORDER BY sop_instance_uid
