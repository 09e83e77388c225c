-- How many images per modality and body part.
SELECT Modality, BodyPartExamined, COUNT(*) AS images
FROM `my-research-project.IRB41449.dicom_current`
GROUP BY Modality, BodyPartExamined
ORDER BY Modality, BodyPartExamined
